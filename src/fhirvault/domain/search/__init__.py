"""FHIR R4 search over blind indexes: parameters, index terms, query parsing, verification.

* `params`  the vendored table of R4 search parameters, compiled into element paths
* `values`  typed values of a resource and their plaintext index terms (`index_terms`)
* `query`   parsing of search requests (`parse_search`) and the terms of a query
* `match`   exact verification of a criterion against a decrypted resource (`matches`)
"""
