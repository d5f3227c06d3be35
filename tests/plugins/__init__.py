"""Runner plug-ins for tests, loaded the way users load theirs: ``--runner module:Class``."""
