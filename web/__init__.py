"""Customer-facing web chat: the `/chat` page and the `closeloop chat` terminal client."""
