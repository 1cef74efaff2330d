"""Course tooling: run labs headlessly, grade, release, benchmark, build the shipped base model."""
