"""What makes a coded session billable beyond its CPT codes: parties, place of service, diagnoses, prices."""
