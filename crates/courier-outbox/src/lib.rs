//! Transactional outbox (PostgreSQL) and relay for courier.
