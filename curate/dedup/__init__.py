"""Deduplication rules: who survives a group, decisions and their files, SemDeDup's steps."""
