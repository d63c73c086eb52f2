"""Serving: generation (infer, ChatBot), request batching, the HTTP app and its web chat page (static/)."""
