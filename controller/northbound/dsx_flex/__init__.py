"""NVIDIA DSX Flex agent (factory side): grid load targets over MQTT, CloudEvents, JWS."""
