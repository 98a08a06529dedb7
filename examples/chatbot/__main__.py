"""`python -m chatbot` (from examples/) or `python -m examples.chatbot` also start the app."""

from .cli import main

raise SystemExit(main())
