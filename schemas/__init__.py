"""JSON Schemas of the job spec and of the files cmbagent-batch writes (package data)."""
