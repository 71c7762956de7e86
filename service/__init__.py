"""seqtune service: the REST API, the study data it owns, and the domain modules workers share."""
