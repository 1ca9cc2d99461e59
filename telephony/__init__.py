"""Twilio edge: webhook signatures, TwiML, inbound parsing and outbound senders."""
