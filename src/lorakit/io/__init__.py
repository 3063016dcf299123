"""Files on disk: the PEFT adapter format (pure key/config mapping) and atomic checkpoint I/O."""
