"""lesionserve train package."""
