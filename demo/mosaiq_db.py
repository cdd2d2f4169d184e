"""A Mosaiq-shaped database schema (the tables and columns RadOnc Backup reads), for the tests
and the benchmark: SQLite, reached through unixODBC like production's SQL Server."""

SCHEMA = """
CREATE TABLE Patient (Pat_ID1 INTEGER PRIMARY KEY, Last_Name TEXT, First_Name TEXT);
CREATE TABLE Ident (Pat_Id1 INTEGER, IDA TEXT);
CREATE TABLE Site (SIT_ID INTEGER PRIMARY KEY, SIT_SET_ID INTEGER, Pat_ID1 INTEGER,
                   Site_Name TEXT, Dose_Ttl FLOAT, Fractions INTEGER, Version INTEGER);
CREATE TABLE TxField (FLD_ID INTEGER PRIMARY KEY, SIT_Set_ID INTEGER, Field_Name TEXT,
                      Modality TEXT, Version INTEGER);
CREATE TABLE Dose_Hst (DH_ID INTEGER PRIMARY KEY, Pat_ID1 INTEGER, FLD_ID INTEGER,
                       SIT_ID INTEGER, Tx_DtTm TIMESTAMP, Fractions_Tx INTEGER, Meterset FLOAT);
CREATE INDEX dose_time ON Dose_Hst (Tx_DtTm);
"""
