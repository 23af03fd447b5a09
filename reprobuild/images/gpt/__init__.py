"""GPT disk images composed from other images."""
