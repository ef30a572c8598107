"""lesionserve service package."""
