"""What crosses the wire: tensor streams and codecs."""
