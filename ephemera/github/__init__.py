"""Reporting to GitHub: commit statuses, one sticky PR comment, and Deployments."""
