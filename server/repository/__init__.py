"""The model repository: layout and version policy, configuration, backends by name, lifecycle."""
