"""fhir-charge-adapter: CPT charges for FNA biopsy Procedures, from FHIR to FHIR."""

__version__ = "0.1.0"
