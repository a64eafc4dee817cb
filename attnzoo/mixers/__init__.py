"""Built-in token mixers, one file each. The registry finds the file of a name from the files' `register("name", ...)`
calls and imports it on first lookup; `registered()` imports them all."""
