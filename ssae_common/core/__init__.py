"""Plumbing every stage shares: errors and exit codes, records and readers, atomic outputs, provenance,
progress, signals, the run context, option fields, small parsers and statistics."""
