"""What a command does, whichever front end asked: the service, pulling, and shared flights."""
