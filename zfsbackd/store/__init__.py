"""The content-addressed store inside one region (see DESIGN.md, "Store format")."""
