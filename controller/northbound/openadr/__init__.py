"""OpenADR 3.1 VEN: events from a VTN (REST, OAuth2, MQTT notifier), reports back."""
