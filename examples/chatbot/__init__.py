"""Citation-grounded chatbot example for at2-rag: `python examples/chatbot/app.py [--docs FOLDER] [--port 8000]`."""

from .app import create_app, main

__all__ = ["create_app", "main"]
