"""The review console: the web page where people approve changes, read the evidence and the
history (``ratchet console``).

An operator tool like the CLI, and like it a client of the services over NATS only
(:mod:`ratchet.console.backend`); its own state, accounts and sessions, is one file in the Ratchet
home (:mod:`ratchet.console.accounts`). The web app is :mod:`ratchet.console.app`; what its pages
show is built in :mod:`ratchet.console.views`.
"""
