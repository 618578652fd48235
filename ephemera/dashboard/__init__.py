"""`ephemera dashboard`: a read-only web page of the environments, one environment's history, and the
totals (ephemera/dashboard/app.py). Its own process and listener, never the webhook's."""
