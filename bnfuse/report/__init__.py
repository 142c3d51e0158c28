"""Reports: the terminal summary (rich); JSON, Markdown, JUnit and HTML come with the verifier."""
