"""`python -m chatbot` (from examples/) or `python -m examples.chatbot` also start the app."""

from .app import main

raise SystemExit(main())
