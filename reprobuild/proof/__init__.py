"""Proving builds: rebuild checks, variations, difference reports, records, signatures."""
