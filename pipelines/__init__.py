"""Prefect flows that chain the DVC stages; they orchestrate and hold no ML logic."""

import os

# Without PREFECT_API_URL a flow starts Prefect's temporary server, which on its first start
# migrates a new SQLite database: 18-19 s on an idle 2-core machine (9 s once migrated), and
# more while anything else runs, against Prefect's default wait of 20 s. Give it three minutes.
# Set here, before any module of this package imports prefect: it reads settings once.
EPHEMERAL_STARTUP_TIMEOUT_S = "180"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)
