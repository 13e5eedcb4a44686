"""Ray Serve deployments and applications (methods are reached through the registry only)."""
