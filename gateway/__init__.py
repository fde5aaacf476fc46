"""TikTok Events Gateway."""
