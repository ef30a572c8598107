"""lesionserve export package."""
