//! TODO: ApiError, ErrorKind, AuthError
