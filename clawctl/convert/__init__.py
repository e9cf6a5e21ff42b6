"""Model format conversions."""
