"""`melo-dist report`: what trained runs learned, as Markdown and HTML with figures."""
