"""Built-in token mixers, one file each; the registry discovers and imports the files of this package."""
