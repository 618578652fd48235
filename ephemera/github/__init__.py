"""GitHub: the App's credentials (`client.py`), who may approve (`permissions.py`), and the reports on
each PR, built (`reports.py`) and sent (`outbox.py`).
"""
