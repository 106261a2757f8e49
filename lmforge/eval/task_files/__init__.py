"""Evaluation tasks shipped with lmforge (JSONL items + YAML specs), and the script that builds them."""
