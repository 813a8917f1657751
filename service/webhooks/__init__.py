"""Webhook subscriptions and at-least-once delivery of alert events."""
