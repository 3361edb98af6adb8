"""The streaming path: inputs of any size coded with bounded memory, with the in-memory path's exact output.

One pass reads every file with the readers of `adapter.sources.files` and spills each resource to an SQLite
index in a temporary folder (`store.py`). A second pass ranks the copies of each resource as
`ResourceIndex` does, finds each Procedure's patient, and groups Procedures into units that must be coded
together (a patient; patients joined by a `partOf` or a shared `Procedure.identifier`). Batches of units are
then coded by `pipeline.code_index` against an index that reads resources from the store on demand
(`index.py`), and what each batch produces is spilled with the key that orders it in the in-memory path's
output, so the Bundle, the table and the diagnostics come out byte for byte as `dry-run` would print them
(`run.py`).
"""
