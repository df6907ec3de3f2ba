"""fhirvault: an encrypted FHIR R4 health-data host."""
__version__ = "0.1.0"
