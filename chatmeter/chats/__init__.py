"""Chats and their messages: storage and the REST endpoints."""
