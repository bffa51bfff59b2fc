"""Accounts, sites, devices, channels and their tokens."""
