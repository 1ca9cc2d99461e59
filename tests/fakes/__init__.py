"""Fake external services (Twilio REST, a business CRM) served on 127.0.0.1 for tests."""
