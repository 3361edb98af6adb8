"""The table files of `config/` beside the coding engine's own: billing (providers, place of service, diagnosis
map, chargemaster, ChargeItemDefinitions) and HL7 v2 (sender, receiver, value maps).

Below `adapter.config` (which loads them into `CodeTables`) and below the packages that use them (billing,
hl7v2), so that imports run one way: a table is data, it knows nothing of what is built from it.
"""
