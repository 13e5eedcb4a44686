"""Developer tools that run from the repository, not from the installed package."""
