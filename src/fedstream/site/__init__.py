"""The site (client) side: its context, its event outbox, and the runtime that answers the server's tasks."""
