"""Backups, continuous replication, restore and disaster-recovery drills."""
