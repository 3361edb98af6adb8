"""The coder's worklist: the review reasons' fixes, review items mirrored as FHIR Tasks, and a web page."""
