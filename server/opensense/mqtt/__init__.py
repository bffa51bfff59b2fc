"""MQTT: the embedded broker, the external-broker consumer, topics and ACLs, the CA."""
