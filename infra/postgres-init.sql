-- One PostgreSQL server, one database (and owner role) per service:
--   mlflow       MLflow tracking store and model registry   (role mlflow)
--   mlflow_auth  MLflow basic-auth user store                (role mlflow)
--   prefect      Prefect server                              (role prefect)
--
-- Run once by the postgres image's entrypoint (mounted into /docker-entrypoint-initdb.d/) when
-- the data volume is empty, as POSTGRES_USER. Later changes to this file need a manual run or
-- a fresh volume. The role passwords come from the postgres container's environment
-- (MLFLOW_DB_PASSWORD, PREFECT_DB_PASSWORD; see infra/.env.example) through psql's \getenv
-- (psql 15+), so no secret is written here; an unset variable fails the initialisation.
\set ON_ERROR_STOP on

\getenv mlflow_db_password MLFLOW_DB_PASSWORD
\getenv prefect_db_password PREFECT_DB_PASSWORD

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_db_password';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_db_password';

CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;

-- Only the owners (and the superuser) may connect.
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;

-- Prefect's migrations use trigram indexes; create the extension as superuser up front.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
